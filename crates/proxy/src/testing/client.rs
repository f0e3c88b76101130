//! Clients of the proxies under test, each bounded in time.

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::SETTLE;

/// An HTTP/1.1 GET over plain TCP, with `Host: web.test` unless `headers`
/// name a host; `None` when the connection is refused, reset or closed
/// without a response.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String, http::HeaderMap)> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let mut request = Request::get(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request = request.header("host", "web.test");
    }
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(http_body_util::Empty::<Bytes>::new()).unwrap();
    let response = tokio::time::timeout(SETTLE, sender.send_request(request))
        .await
        .ok()?
        .ok()?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned(), headers))
}

/// An HTTP/2 (prior knowledge) request to `http://web.web{path}` with a
/// five-byte body: status, headers, body and trailers.
pub async fn h2(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, String, Option<http::HeaderMap>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut r = Request::builder()
        .method(method)
        .uri(format!("http://web.web{path}"));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let body = http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\0"));
    let response = tokio::time::timeout(SETTLE, sender.send_request(r.body(body).unwrap()))
        .await
        .unwrap()
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let collected = tokio::time::timeout(SETTLE, response.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    let trailers = collected.trailers().cloned();
    let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
    (status, headers, body, trailers)
}

/// The echo application's view of a request.
pub fn seen(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not an echo answer: {body}"))
}

/// Writes raw bytes and reads until the peer closes (bounded).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(SETTLE, tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// An address on 127.0.0.1 where nothing listens (bound, then released),
/// for a peer that must be unreachable. Never listen on it: that is the
/// bind-and-release race every listener here avoids by binding port 0.
pub fn closed_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
