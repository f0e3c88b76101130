//! `envoyExtAuthzHttp` providers: the check is an HTTP request, as
//! Envoy's `ext_authz` filter sends it to an HTTP service.
//!
//! The check request has the original method and path (after `pathPrefix`),
//! the original `Host`, the headers `includeRequestHeadersInCheck` names, the
//! `includeAdditionalHeadersInCheck` ones, and the held body when
//! `includeRequestBodyInCheck` asks for it (none otherwise). A 200 answer
//! allows; any other status denies with that status and the authorizer's
//! body.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Version};
use http_body_util::{BodyExt, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meshward_policy::api::EnvoyExtAuthzHttp;
use meshward_policy::authz::CustomVerdict;
use meshward_policy::authz::matcher::StringMatch;

use super::{
    ExtAuthzAnswer, HeaderMutation, HttpCheck, MeshServices, PlainDial, ProviderError, Verdict,
    service_host,
};
use crate::http::{Body, full};

/// A denial body larger than this is cut.
const MAX_DENY_BODY: usize = 64 * 1024;

/// The client of HTTP providers: an authorizer the mesh knows is called
/// through its service's pools (mutual TLS, secure naming), any other over
/// a pooled plaintext HTTP/1.1 client.
#[derive(Clone)]
pub struct HttpProvider {
    mesh: MeshServices,
    plain: Client<PlainDial, Body>,
}

impl HttpProvider {
    pub fn new(mesh: MeshServices, plain: PlainDial) -> HttpProvider {
        HttpProvider {
            mesh,
            plain: Client::builder(TokioExecutor::new()).build(plain),
        }
    }

    /// Asks `provider` about `request`.
    pub async fn check(
        &self,
        provider: &EnvoyExtAuthzHttp,
        request: HttpCheck<'_>,
    ) -> Result<ExtAuthzAnswer, ProviderError> {
        let mut check = check_request(provider, &request).map_err(ProviderError::Request)?;
        let host = service_host(&provider.service);
        let port = u16::try_from(provider.port)
            .map_err(|_| ProviderError::Request(format!("port {} is not a port", provider.port)))?;
        let response = match self.mesh.find(host, port) {
            Some(target) => {
                // Held (counted busy) until the answer is in.
                let endpoint = target
                    .pick()
                    .ok_or_else(|| ProviderError::Request("the service has no endpoint".into()))?;
                let (client, version) = endpoint.http.for_version(Version::HTTP_11);
                *check.version_mut() = version;
                client.request(check).await?
            }
            None => self.plain.request(check).await?,
        };
        let (parts, body) = response.into_parts();
        let pick = |patterns: &[String]| -> Vec<HeaderMutation> {
            let matchers: Vec<StringMatch> = patterns
                .iter()
                .map(|p| StringMatch::parse_ignore_case(p))
                .collect();
            parts
                .headers
                .iter()
                .filter(|(name, _)| matchers.iter().any(|m| m.matches(name.as_str())))
                .map(|(n, v)| HeaderMutation::overwrite(n.clone(), v.clone()))
                .collect()
        };
        if parts.status == http::StatusCode::OK {
            return Ok(ExtAuthzAnswer {
                verdict: Verdict(CustomVerdict::Allow),
                upstream_headers: pick(&provider.headers_to_upstream_on_allow),
                downstream_headers: pick(&provider.headers_to_downstream_on_allow),
                ..Default::default()
            });
        }
        let body = match Limited::new(body, MAX_DENY_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        };
        Ok(ExtAuthzAnswer {
            verdict: Verdict(CustomVerdict::Deny(parts.status.as_u16())),
            downstream_headers: pick(&provider.headers_to_downstream_on_deny),
            body,
            ..Default::default()
        })
    }
}

fn check_request(
    http: &EnvoyExtAuthzHttp,
    request: &HttpCheck<'_>,
) -> Result<Request<Body>, String> {
    let uri = format!(
        "http://{}:{}{}{}",
        service_host(&http.service),
        http.port,
        http.path_prefix,
        request.target
    );
    let body = request.body.map(|b| b.bytes.clone()).unwrap_or_default();
    let length = body.len();
    let mut check = Request::builder()
        .method(request.method.clone())
        .uri(&uri)
        .body(full(body))
        .map_err(|e| format!("check request to {uri}: {e}"))?;
    let matchers: Vec<StringMatch> = http
        .include_request_headers_in_check
        .iter()
        .map(|h| StringMatch::parse_ignore_case(h))
        .collect();
    let out = check.headers_mut();
    for (name, value) in request.headers {
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
    if let Ok(host) = HeaderValue::from_str(request.authority) {
        out.insert(header::HOST, host);
    }
    out.remove(header::TRANSFER_ENCODING);
    out.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, Method};

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
        let body = super::super::CheckedBody {
            bytes: Bytes::from_static(b"hello"),
            partial: false,
        };
        let request = HttpCheck {
            method: &Method::POST,
            target: "/a?b=1",
            authority: "web:80",
            scheme: "http",
            version: http::Version::HTTP_11,
            headers: &headers,
            body: Some(&body),
            time: std::time::SystemTime::now(),
        };
        let r = check_request(&http, &request).unwrap();
        assert_eq!(r.method(), Method::POST);
        assert_eq!(r.uri(), "http://ext-authz.foo.svc:8000/check/a?b=1");
        assert_eq!(r.headers()["x-ext-authz-user"], "alice");
        assert_eq!(r.headers()["x-extra"], "1");
        assert_eq!(r.headers()["host"], "web:80");
        assert!(r.headers().get("cookie").is_none());
        assert_eq!(
            r.headers()["content-length"],
            "5",
            "the held body is the check's body"
        );
    }
}
