//! `meshward demo-app`: a tiny workload for demos and tests. It answers
//! every request with its name, the request it saw and the headers it
//! received (so `x-forwarded-client-cert` and JWT output headers show, as
//! httpbin's `/headers` shows them), and calls on request:
//!
//! - `GET /call?url=URL` — fetches URL (plain HTTP, usually the local
//!   listener of a proxy's upstream) and answers with its status and body;
//! - `GET /call/HOST:PORT/PATH` — the same for service HOST:PORT: at the
//!   address `--upstream HOST:PORT=ADDR` gives (explicit mode), else by
//!   name (transparent mode), so chains A → B → C read
//!   `/call/b.ns:80/call/c.ns:80/`;
//! - `GET /status/CODE` — answers CODE;
//! - `GET /delay/MS` — answers after MS milliseconds (at most a minute).
//!
//! `--tcp-echo ADDR` also echoes raw TCP.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The name it answers with.
    #[arg(long)]
    name: String,
    /// Where to serve HTTP.
    #[arg(long)]
    listen: SocketAddr,
    /// Also echo raw TCP here.
    #[arg(long)]
    tcp_echo: Option<SocketAddr>,
    /// A service it can call as `/call/HOST:PORT/...`, at ADDR (repeatable).
    #[arg(long = "upstream", value_name = "HOST:PORT=ADDR")]
    upstreams: Vec<String>,
}

/// Bodies from `/call` are cut here.
const MAX_BODY: usize = 1 << 20;

struct App {
    name: String,
    upstreams: BTreeMap<String, String>,
    client: Client<HttpConnector, Empty<Bytes>>,
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
        if let Some(addr) = args.tcp_echo {
            let echo = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--tcp-echo {addr}"))?;
            tokio::spawn(tcp_echo(echo));
        }
        eprintln!("demo-app {}: http://{}", args.name, listener.local_addr()?);
        let mut upstreams = BTreeMap::new();
        for u in &args.upstreams {
            let Some((service, addr)) = u.split_once('=') else {
                anyhow::bail!("--upstream takes HOST:PORT=ADDR, got {u:?}");
            };
            upstreams.insert(service.to_owned(), addr.to_owned());
        }
        let app = Arc::new(App {
            name: args.name,
            upstreams,
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let serve = async {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let app = app.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |request| handle(app.clone(), request));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        };
        tokio::select! {
            () = serve => {}
            () = crate::cmd::server::shutdown_signal() => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}

async fn tcp_echo(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let (mut r, mut w) = tcp.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(
    app: Arc<App>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let headers: BTreeMap<String, String> = request
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut seen = serde_json::json!({
        "name": app.name,
        "method": request.method().as_str(),
        "path": request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "headers": headers,
    });
    let mut status = StatusCode::OK;
    if let Some(code) = path.strip_prefix("/status/") {
        status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        let ms = ms.parse::<u64>().unwrap_or(0).min(60_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    } else if path == "/call" || path.starts_with("/call/") {
        let url = match path.strip_prefix("/call/") {
            Some(rest) => {
                let (service, tail) = rest.split_once('/').unwrap_or((rest, ""));
                let query = request
                    .uri()
                    .query()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default();
                // A known upstream at its local address; otherwise the
                // service by name (transparent mode resolves and routes it).
                Some(match app.upstreams.get(service) {
                    Some(addr) => format!("http://{addr}/{tail}{query}"),
                    None => format!("http://{service}/{tail}{query}"),
                })
            }
            None => request.uri().query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("url="))
                    .map(|u| {
                        percent_encoding::percent_decode_str(u)
                            .decode_utf8_lossy()
                            .into_owned()
                    })
            }),
        };
        let Some(url) = url else {
            return Ok(json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "/call needs ?url=http://... or /call/HOST:PORT/... for a known upstream", "upstreams": app.upstreams}),
            ));
        };
        let called = call(&app.client, &url).await;
        seen["call"] = match called {
            Ok((code, body)) => {
                serde_json::json!({"url": url, "status": code, "body": serde_json::from_str::<serde_json::Value>(&body).unwrap_or(serde_json::Value::String(body))})
            }
            Err(e) => {
                status = StatusCode::BAD_GATEWAY;
                serde_json::json!({"url": url, "error": e})
            }
        };
    }
    Ok(json(status, &seen))
}

async fn call(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
) -> Result<(u16, String), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let request = Request::get(uri)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .map_err(|_| "timed out after 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
