//! `envoyExtAuthzGrpc` providers: Envoy's `envoy.service.auth.v3.Authorization/Check`
//! over HTTP/2, for HTTP requests and TCP connections.
//!
//! The `CheckRequest` is filled as Envoy's `ext_authz` filters fill it
//! (README, "CUSTOM authorization", lists every field); the
//! `CheckResponse` is read as Envoy reads it: a missing or `OK` status
//! allows, with the `ok_response` edits; `error_response` is a failure
//! (`failOpen`, `statusOnError`); anything else denies, with the
//! `denied_response` status (403 unless it names one), headers and body.
//!
//! One channel per provider address is kept and shared by every check (an
//! HTTP/2 connection multiplexes them). An authorizer the mesh knows (an
//! `--upstream` or a service of the control plane's) is dialed through
//! that service's connector: mutual TLS, accepted only as the identities
//! allowed to run it. Others are dialed in plaintext ([`PlainDial`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{
    Address, HeaderValueOption, SocketAddress, address, socket_address,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{self, Peer};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::{Struct, Timestamp, Value, value};
use http::header::{HeaderName, HeaderValue};
use meshward_policy::api::EnvoyExtAuthzGrpc;
use meshward_policy::authz::CustomVerdict;
use tonic::transport::{Channel, Endpoint};

use super::{
    CONNECT_TIMEOUT, Check, ExtAuthzAnswer, HeaderAction, HeaderMutation, HttpCheck, MeshServices,
    PlainDial, ProviderError, Verdict, service_host,
};
use crate::outbound::OutboundTarget;

/// Envoy's header telling the authorizer whether `body` is cut short.
const PARTIAL_BODY: &str = "x-envoy-auth-partial-body";

/// The gRPC client of every `envoyExtAuthzGrpc` provider.
#[derive(Clone)]
pub struct GrpcProvider {
    mesh: MeshServices,
    plain: PlainDial,
    channels: Arc<Mutex<HashMap<(String, u16), Pooled>>>,
}

/// A channel, and the mesh service it was made for (`None`: plaintext).
struct Pooled {
    target: Option<Arc<OutboundTarget>>,
    channel: Channel,
}

impl GrpcProvider {
    pub fn new(mesh: MeshServices, plain: PlainDial) -> GrpcProvider {
        GrpcProvider {
            mesh,
            plain,
            channels: Arc::default(),
        }
    }

    /// The shared channel to `host:port`, made on first use, and again
    /// when the mesh's service for it is replaced.
    fn channel(&self, host: &str, port: u16) -> Result<Channel, ProviderError> {
        let target = self.mesh.find(host, port);
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (host.to_owned(), port);
        if let Some(pooled) = channels.get(&key) {
            let same = match (&pooled.target, &target) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same {
                return Ok(pooled.channel.clone());
            }
        }
        let endpoint = Endpoint::from_shared(format!("http://{host}:{port}"))
            .map_err(|e| ProviderError::Request(format!("address {host}:{port}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = match &target {
            Some(target) => endpoint.connect_with_connector_lazy(target.h2_connector()),
            None => endpoint.connect_with_connector_lazy(self.plain),
        };
        channels.insert(
            key,
            Pooled {
                target,
                channel: channel.clone(),
            },
        );
        Ok(channel)
    }

    /// Asks `provider` about `check`.
    pub async fn check(
        &self,
        provider: &EnvoyExtAuthzGrpc,
        port: u32,
        check: Check<'_>,
    ) -> Result<ExtAuthzAnswer, ProviderError> {
        let port = u16::try_from(port)
            .map_err(|_| ProviderError::Request(format!("port {port} is not a port")))?;
        let channel = self.channel(service_host(&provider.service), port)?;
        let request = check_request(provider, check);
        let response = AuthorizationClient::new(channel)
            .check(request)
            .await
            .map_err(|status| {
                // A transport failure's cause (refused, TLS) is the status's
                // source, which says more than its message.
                let message = std::error::Error::source(&status).map_or_else(
                    || status.message().to_owned(),
                    meshward_identity::error_chain,
                );
                ProviderError::Grpc {
                    code: status.code(),
                    message,
                }
            })?;
        Ok(answer(response.into_inner()))
    }
}

fn socket(addr: SocketAddr) -> Option<Address> {
    Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            protocol: socket_address::Protocol::Tcp.into(),
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..Default::default()
        })),
    })
}

fn timestamp(time: SystemTime) -> Timestamp {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// The `CheckRequest` Envoy would send for `check`.
pub fn check_request(provider: &EnvoyExtAuthzGrpc, check: Check<'_>) -> CheckRequest {
    let peers = check.peers;
    let request = check.http.map(|http| attribute_context::Request {
        time: Some(timestamp(http.time)),
        http: Some(http_request(provider, &http)),
    });
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: socket(peers.source),
                principal: peers.source_principal.as_deref().unwrap_or("").to_owned(),
                ..Default::default()
            }),
            destination: Some(Peer {
                address: socket(peers.destination),
                principal: peers.destination_principal.clone(),
                ..Default::default()
            }),
            request,
            ..Default::default()
        }),
    }
}

fn http_request(
    provider: &EnvoyExtAuthzGrpc,
    http: &HttpCheck<'_>,
) -> attribute_context::HttpRequest {
    // Lower-case names (as HTTP/2 has them), the pseudo-headers Envoy keeps
    // in its header map, repeated headers joined with commas.
    let mut headers: HashMap<String, String> = HashMap::new();
    for (name, value) in [
        (":authority", http.authority),
        (":method", http.method.as_str()),
        (":path", http.target),
        (":scheme", http.scheme),
    ] {
        headers.insert(name.to_owned(), value.to_owned());
    }
    for (name, value) in http.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let size = http
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(-1);
    let mut request = attribute_context::HttpRequest {
        // Envoy's stream id: a random 64-bit number.
        id: fastrand::u64(..).to_string(),
        method: http.method.as_str().to_owned(),
        path: http.target.to_owned(),
        host: http.authority.to_owned(),
        scheme: http.scheme.to_owned(),
        protocol: match http.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        }
        .to_owned(),
        size,
        ..Default::default()
    };
    if let Some(body) = http.body {
        let pack_as_bytes = provider
            .include_request_body_in_check
            .as_ref()
            .is_some_and(|b| b.pack_as_bytes);
        if pack_as_bytes {
            request.raw_body = body.bytes.to_vec();
        } else {
            // Protobuf strings are UTF-8: other bytes are replaced (U+FFFD);
            // `packAsBytes` sends them as they are.
            request.body = String::from_utf8_lossy(&body.bytes).into_owned();
        }
        headers.insert(PARTIAL_BODY.to_owned(), body.partial.to_string());
    }
    request.headers = headers;
    request
}

/// Reads a `CheckResponse` as Envoy does.
pub fn answer(response: CheckResponse) -> ExtAuthzAnswer {
    let code = response.status.as_ref().map_or(0, |s| s.code);
    let mut metadata = response.dynamic_metadata;
    let answer = match response.http_response {
        _ if code == 0 => {
            let mut answer = ExtAuthzAnswer {
                verdict: Verdict(CustomVerdict::Allow),
                ..Default::default()
            };
            if let Some(HttpResponse::OkResponse(ok)) = response.http_response {
                answer.upstream_headers = mutations(&ok.headers);
                answer.downstream_headers = mutations(&ok.response_headers_to_add);
                answer.remove_headers = ok
                    .headers_to_remove
                    .iter()
                    .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                    .filter(|n| n != http::header::HOST)
                    .collect();
                answer.query_set = ok
                    .query_parameters_to_set
                    .into_iter()
                    .map(|q| (q.key, q.value))
                    .collect();
                answer.query_remove = ok.query_parameters_to_remove;
                #[allow(deprecated)] // Envoy still reads it, over the outer one.
                if ok.dynamic_metadata.is_some() {
                    metadata = ok.dynamic_metadata;
                }
            }
            answer
        }
        Some(HttpResponse::ErrorResponse(error)) => ExtAuthzAnswer::error(format!(
            "the authorizer answered with an error (gRPC status {code}, HTTP status {})",
            error.status.map_or(0, |s| s.code)
        )),
        denied => {
            let mut answer = ExtAuthzAnswer {
                verdict: Verdict(CustomVerdict::Deny(403)),
                ..Default::default()
            };
            if let Some(HttpResponse::DeniedResponse(denied)) = denied {
                let status = denied.status.map_or(0, |s| s.code);
                if let Ok(status @ 200..=599) = u16::try_from(status) {
                    answer.verdict = Verdict(CustomVerdict::Deny(status));
                }
                answer.downstream_headers = mutations(&denied.headers);
                answer.body = denied.body.into();
            }
            answer
        }
    };
    ExtAuthzAnswer {
        dynamic_metadata: metadata.map(|m| struct_json(&m)),
        ..answer
    }
}

/// Header edits as Envoy applies them: the deprecated `append` when set
/// (true appends, false overwrites), else `append_action`. Pseudo-headers,
/// `Host` and values HTTP cannot carry are left out.
fn mutations(options: &[HeaderValueOption]) -> Vec<HeaderMutation> {
    options
        .iter()
        .filter_map(|option| {
            let header = option.header.as_ref()?;
            let name = HeaderName::from_bytes(header.key.as_bytes()).ok()?;
            if name == http::header::HOST {
                return None;
            }
            let value = if header.raw_value.is_empty() {
                HeaderValue::from_str(&header.value).ok()?
            } else {
                HeaderValue::from_bytes(&header.raw_value).ok()?
            };
            #[allow(deprecated)]
            let action = match option.append {
                Some(append) if append.value => HeaderAction::Append,
                Some(_) => HeaderAction::Overwrite,
                None => match HeaderAppendAction::try_from(option.append_action) {
                    Ok(HeaderAppendAction::AppendIfExistsOrAdd) => HeaderAction::Append,
                    Ok(HeaderAppendAction::AddIfAbsent) => HeaderAction::AddIfAbsent,
                    Ok(HeaderAppendAction::OverwriteIfExists) => HeaderAction::OverwriteIfExists,
                    Ok(HeaderAppendAction::OverwriteIfExistsOrAdd) | Err(_) => {
                        HeaderAction::Overwrite
                    }
                },
            };
            Some(HeaderMutation {
                name,
                value,
                action,
            })
        })
        .collect()
}

fn struct_json(s: &Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

fn value_json(v: &Value) -> serde_json::Value {
    match &v.kind {
        None | Some(value::Kind::NullValue(_)) => serde_json::Value::Null,
        Some(value::Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        Some(value::Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(value::Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(value::Kind::StructValue(s)) => struct_json(s),
        Some(value::Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_json).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderValue as PbHeader, QueryParameter};
    use envoy_types::pb::envoy::service::auth::v3::{DeniedHttpResponse, OkHttpResponse};
    use envoy_types::pb::envoy::r#type::v3::HttpStatus;
    use envoy_types::pb::google::rpc::Status;

    fn option(key: &str, value: &str, append: Option<bool>, action: i32) -> HeaderValueOption {
        #[allow(deprecated)]
        HeaderValueOption {
            header: Some(PbHeader {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            }),
            append: append.map(|value| envoy_types::pb::google::protobuf::BoolValue { value }),
            append_action: action,
            ..Default::default()
        }
    }

    #[test]
    fn an_empty_response_allows_as_in_envoy() {
        assert!(answer(CheckResponse::default()).allowed());
    }

    #[test]
    fn ok_responses_carry_their_edits() {
        let response = CheckResponse {
            status: Some(Status::default()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![
                    option("x-a", "1", None, 0),
                    option("x-b", "2", Some(false), 0),
                    option("x-c", "3", None, 1),
                    option("host", "evil", None, 2),
                ],
                headers_to_remove: vec!["x-gone".into(), "host".into()],
                response_headers_to_add: vec![option("x-down", "d", None, 2)],
                query_parameters_to_set: vec![QueryParameter {
                    key: "k".into(),
                    value: "v".into(),
                }],
                query_parameters_to_remove: vec!["r".into()],
                ..Default::default()
            })),
            dynamic_metadata: Some(Struct {
                fields: [(
                    "user".to_owned(),
                    Value {
                        kind: Some(value::Kind::StringValue("alice".into())),
                    },
                )]
                .into_iter()
                .collect(),
            }),
        };
        let a = answer(response);
        assert!(a.allowed());
        let actions: Vec<_> = a
            .upstream_headers
            .iter()
            .map(|m| (m.name.as_str(), m.action))
            .collect();
        assert_eq!(
            actions,
            [
                ("x-a", HeaderAction::Append),
                ("x-b", HeaderAction::Overwrite),
                ("x-c", HeaderAction::AddIfAbsent),
            ],
            "Host is never the authorizer's to change"
        );
        assert_eq!(a.remove_headers, [HeaderName::from_static("x-gone")]);
        assert_eq!(a.downstream_headers[0].name, "x-down");
        assert_eq!(a.query_set, [("k".to_owned(), "v".to_owned())]);
        assert_eq!(a.query_remove, ["r"]);
        assert_eq!(a.dynamic_metadata.unwrap()["user"], "alice");
    }

    #[test]
    fn denials_carry_status_headers_and_body_and_errors_are_failures() {
        let denied = |status| CheckResponse {
            status: Some(Status {
                code: 7,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: status }),
                headers: vec![option("x-why", "nope", None, 2)],
                body: "go away".into(),
            })),
            dynamic_metadata: None,
        };
        let a = answer(denied(401));
        assert!(matches!(a.verdict.0, CustomVerdict::Deny(401)));
        assert_eq!(a.body, "go away");
        assert_eq!(a.downstream_headers[0].value, "nope");
        let a = answer(denied(0));
        assert!(
            matches!(a.verdict.0, CustomVerdict::Deny(403)),
            "403 unless named"
        );
        let bare = CheckResponse {
            status: Some(Status {
                code: 7,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(answer(bare).verdict.0, CustomVerdict::Deny(403)));
        let error = CheckResponse {
            status: Some(Status {
                code: 13,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::ErrorResponse(DeniedHttpResponse::default())),
            dynamic_metadata: None,
        };
        assert!(matches!(answer(error).verdict.0, CustomVerdict::Error(_)));
    }

    #[test]
    fn http_attributes_are_filled_as_envoy_fills_them() {
        let peers = super::super::Peers {
            source: "[2001:db8::1]:5000".parse().unwrap(),
            source_principal: None,
            destination: "10.0.0.2:9000".parse().unwrap(),
            destination_principal: "spiffe://cluster.local/ns/c/sa/d".into(),
        };
        let mut headers = http::HeaderMap::new();
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let body = super::super::CheckedBody {
            bytes: bytes::Bytes::from_static(b"ok\xff"),
            partial: true,
        };
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 5);
        let http = HttpCheck {
            method: &http::Method::PUT,
            target: "/p?q=1",
            authority: "web.web:80",
            scheme: "http",
            version: http::Version::HTTP_2,
            headers: &headers,
            body: Some(&body),
            time,
        };
        let settings = |pack_as_bytes| EnvoyExtAuthzGrpc {
            include_request_body_in_check: Some(meshward_policy::api::RequestBodyInCheck {
                max_request_bytes: 3,
                allow_partial_message: true,
                pack_as_bytes,
            }),
            ..Default::default()
        };
        let check = Check {
            peers: &peers,
            http: Some(http),
        };
        let attrs = check_request(&settings(false), check).attributes.unwrap();
        // Plaintext: no principal; IPv6 addresses without brackets.
        let source = attrs.source.unwrap();
        assert_eq!(source.principal, "");
        let Some(address::Address::SocketAddress(a)) = source.address.unwrap().address else {
            panic!("a socket address")
        };
        assert_eq!(a.address, "2001:db8::1");
        let request = attrs.request.unwrap();
        assert_eq!(
            request.time.unwrap(),
            Timestamp {
                seconds: 1_700_000_000,
                nanos: 5
            }
        );
        let h = request.http.unwrap();
        assert_eq!(h.protocol, "HTTP/2");
        assert_eq!(h.method, "PUT");
        assert_eq!(h.path, "/p?q=1");
        assert_eq!(h.host, "web.web:80");
        assert_eq!(h.scheme, "http");
        assert_eq!(h.size, -1, "no Content-Length");
        assert_eq!(h.headers["x-multi"], "a,b");
        assert_eq!(h.headers[":method"], "PUT");
        assert_eq!(h.headers[":scheme"], "http");
        assert_eq!(h.headers[PARTIAL_BODY], "true");
        assert_eq!(h.body, "ok\u{fffd}", "UTF-8 text, other bytes replaced");
        assert!(h.raw_body.is_empty());
        let attrs = check_request(&settings(true), check).attributes.unwrap();
        let h = attrs.request.unwrap().http.unwrap();
        assert_eq!(h.raw_body, b"ok\xff", "packAsBytes: the bytes as they are");
        assert!(h.body.is_empty());
    }

    #[test]
    fn tcp_checks_carry_the_connection_only() {
        let peers = super::super::Peers {
            source: "10.0.0.1:5000".parse().unwrap(),
            source_principal: Some("spiffe://cluster.local/ns/a/sa/b".into()),
            destination: "10.0.0.2:9000".parse().unwrap(),
            destination_principal: "spiffe://cluster.local/ns/c/sa/d".into(),
        };
        let r = check_request(
            &EnvoyExtAuthzGrpc::default(),
            Check {
                peers: &peers,
                http: None,
            },
        );
        let attrs = r.attributes.unwrap();
        assert!(attrs.request.is_none());
        assert_eq!(
            attrs.source.unwrap().principal,
            "spiffe://cluster.local/ns/a/sa/b"
        );
        let destination = attrs.destination.unwrap();
        assert_eq!(destination.principal, "spiffe://cluster.local/ns/c/sa/d");
        let Some(address::Address::SocketAddress(a)) = destination.address.unwrap().address else {
            panic!("a socket address")
        };
        assert_eq!(a.address, "10.0.0.2");
        assert_eq!(
            a.port_specifier,
            Some(socket_address::PortSpecifier::PortValue(9000))
        );
    }
}
