//! CUSTOM authorization: asking an external HTTP authorizer, as Envoy's
//! `ext_authz` filter does for MeshConfig's `envoyExtAuthzHttp` providers.
//!
//! The check request has the original method and path (after `pathPrefix`),
//! the original `Host`, the headers `includeRequestHeadersInCheck` names, the
//! `includeAdditionalHeadersInCheck` ones, and no body. A 200 answer allows;
//! any other status denies with that status and the authorizer's body; no
//! answer within `timeout` is an error, which `failOpen` and `statusOnError`
//! turn into a decision in the policy engine.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshward_policy::api::{EnvoyExtAuthzHttp, ExtensionProvider};
use meshward_policy::authz::CustomVerdict;
use meshward_policy::authz::matcher::StringMatch;

/// Istio's default provider timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// A denial body larger than this is cut.
const MAX_DENY_BODY: usize = 64 * 1024;

/// The authorizer's answer and what it asks the proxy to add.
#[derive(Debug)]
pub struct ExtAuthzAnswer {
    pub verdict: CustomVerdict,
    /// Headers for the application (`headersToUpstreamOnAllow`).
    pub upstream_headers: Vec<(HeaderName, HeaderValue)>,
    /// Headers for the client (`headersToDownstreamOnAllow` / `OnDeny`).
    pub downstream_headers: Vec<(HeaderName, HeaderValue)>,
    /// The authorizer's response body, sent to the client on denial.
    pub body: Bytes,
}

impl ExtAuthzAnswer {
    fn error(message: String) -> ExtAuthzAnswer {
        ExtAuthzAnswer {
            verdict: CustomVerdict::Error(message),
            upstream_headers: Vec::new(),
            downstream_headers: Vec::new(),
            body: Bytes::new(),
        }
    }
}

/// The client every CUSTOM check goes through.
#[derive(Clone)]
pub struct ExtAuthz {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for ExtAuthz {
    fn default() -> ExtAuthz {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        ExtAuthz {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

impl ExtAuthz {
    /// Asks `provider` about the request with `method`, `target` (path and
    /// query), `authority` and `headers`.
    pub async fn check(
        &self,
        provider: &ExtensionProvider,
        method: &Method,
        target: &str,
        authority: &str,
        headers: &HeaderMap,
    ) -> ExtAuthzAnswer {
        let Some(http) = &provider.envoy_ext_authz_http else {
            return ExtAuthzAnswer::error(format!(
                "provider {:?} is envoyExtAuthzGrpc, which meshward's proxy does not speak yet",
                provider.name
            ));
        };
        let timeout = http
            .timeout
            .as_deref()
            .and_then(meshward_policy::duration::parse)
            .unwrap_or(DEFAULT_TIMEOUT);
        let request = match check_request(http, method, target, authority, headers) {
            Ok(r) => r,
            Err(e) => return ExtAuthzAnswer::error(e),
        };
        let response = match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return ExtAuthzAnswer::error(format!(
                    "provider {:?} ({}:{}): {e}",
                    provider.name, http.service, http.port
                ));
            }
            Err(_) => {
                return ExtAuthzAnswer::error(format!(
                    "provider {:?} did not answer within {timeout:?}",
                    provider.name
                ));
            }
        };
        let (parts, body) = response.into_parts();
        let allowed = parts.status == http::StatusCode::OK;
        let pick = |patterns: &[String]| -> Vec<(HeaderName, HeaderValue)> {
            let matchers: Vec<StringMatch> = patterns
                .iter()
                .map(|p| StringMatch::parse_ignore_case(p))
                .collect();
            parts
                .headers
                .iter()
                .filter(|(name, _)| matchers.iter().any(|m| m.matches(name.as_str())))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect()
        };
        if allowed {
            ExtAuthzAnswer {
                verdict: CustomVerdict::Allow,
                upstream_headers: pick(&http.headers_to_upstream_on_allow),
                downstream_headers: pick(&http.headers_to_downstream_on_allow),
                body: Bytes::new(),
            }
        } else {
            let body =
                match tokio::time::timeout(timeout, Limited::new(body, MAX_DENY_BODY).collect())
                    .await
                {
                    Ok(Ok(collected)) => collected.to_bytes(),
                    _ => Bytes::new(),
                };
            ExtAuthzAnswer {
                verdict: CustomVerdict::Deny(parts.status.as_u16()),
                upstream_headers: Vec::new(),
                downstream_headers: pick(&http.headers_to_downstream_on_deny),
                body,
            }
        }
    }
}

/// `service` may be `namespace/host`; the host is what is dialed.
fn service_host(service: &str) -> &str {
    service.rsplit_once('/').map_or(service, |(_, host)| host)
}

fn check_request(
    http: &EnvoyExtAuthzHttp,
    method: &Method,
    target: &str,
    authority: &str,
    headers: &HeaderMap,
) -> Result<Request<Empty<Bytes>>, String> {
    let uri = format!(
        "http://{}:{}{}{}",
        service_host(&http.service),
        http.port,
        http.path_prefix,
        target
    );
    let mut request = Request::builder()
        .method(method.clone())
        .uri(&uri)
        .body(Empty::new())
        .map_err(|e| format!("check request to {uri}: {e}"))?;
    let matchers: Vec<StringMatch> = http
        .include_request_headers_in_check
        .iter()
        .map(|h| StringMatch::parse_ignore_case(h))
        .collect();
    let out = request.headers_mut();
    for (name, value) in headers {
        if matchers.iter().any(|m| m.matches(name.as_str())) {
            out.append(name.clone(), value.clone());
        }
    }
    for (name, value) in &http.include_additional_headers_in_check {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            out.insert(n, v);
        }
    }
    if let Ok(host) = HeaderValue::from_str(authority) {
        out.insert(header::HOST, host);
    }
    out.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_requests_carry_only_what_the_provider_asks_for() {
        let http = EnvoyExtAuthzHttp {
            service: "foo/ext-authz.foo.svc".into(),
            port: 8000,
            path_prefix: "/check".into(),
            include_request_headers_in_check: vec!["x-ext-authz*".into()],
            include_additional_headers_in_check: [("x-extra".to_owned(), "1".to_owned())]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-ext-authz-user", HeaderValue::from_static("alice"));
        headers.insert("cookie", HeaderValue::from_static("secret"));
        let r = check_request(&http, &Method::POST, "/a?b=1", "web:80", &headers).unwrap();
        assert_eq!(r.method(), Method::POST);
        assert_eq!(r.uri(), "http://ext-authz.foo.svc:8000/check/a?b=1");
        assert_eq!(r.headers()["x-ext-authz-user"], "alice");
        assert_eq!(r.headers()["x-extra"], "1");
        assert_eq!(r.headers()["host"], "web:80");
        assert!(r.headers().get("cookie").is_none());
    }
}
