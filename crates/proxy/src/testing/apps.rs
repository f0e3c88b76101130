//! Applications behind the proxies under test, each on a port the system
//! chose.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// An HTTP application that answers with what it received, as JSON:
/// `{"name","method","path","version","headers":{..}}`. `/delay/MS` answers
/// after MS milliseconds. gRPC requests get a gRPC answer with trailers.
pub async fn echo_app(name: &'static str) -> SocketAddr {
    counting_echo_app(name).await.0
}

/// [`echo_app`], with the number of requests it has received.
pub async fn counting_echo_app(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |r| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    echo(name, r)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, requests)
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn echo(
    name: &'static str,
    request: Request<Incoming>,
) -> Result<Response<EchoBody>, Infallible> {
    let path = request.uri().path().to_owned();
    if let Some(ms) = path.strip_prefix("/delay/") {
        let ms = Duration::from_millis(ms.parse().unwrap_or(0));
        tokio::time::sleep(ms).await; // pacing: the delay asked for
    }
    let headers: BTreeMap<String, String> = request
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let grpc = headers
        .get("content-type")
        .is_some_and(|c| c.starts_with("application/grpc"));
    let body = serde_json::json!({
        "name": name,
        "method": request.method().as_str(),
        "path": request.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
        "version": format!("{:?}", request.version()),
        "headers": headers,
    })
    .to_string();
    let _ = request.into_body().collect().await;
    if grpc {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = Frames(vec![Frame::data(Bytes::from(body)), Frame::trailers(trailers)].into());
        let mut r = Response::new(frames.boxed());
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        return Ok(r);
    }
    Ok(Response::new(Full::new(Bytes::from(body)).boxed()))
}

/// A body of given frames: data, then trailers.
struct Frames(VecDeque<Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// A TCP application that echoes every byte back.
pub async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}
