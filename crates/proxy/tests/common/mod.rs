//! A small mesh on 127.0.0.1 for proxy tests: a CA, workload certificates,
//! echo applications, proxies started in-process with their own ports and
//! temp dirs, and clients.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshward_identity::ca::{CaFiles, CertificateAuthority};
use meshward_identity::spiffe::SpiffeId;
use meshward_identity::tls::{self, TrustDomains, WatchedCert};
use meshward_policy::authn::JwksCache;
use meshward_policy::{Workload, load};
use meshward_proxy::config::{InboundPort, Limits, ProxyConfig, Upstream};
use meshward_proxy::identity::WorkloadIdentity;
use meshward_proxy::log::LogTarget;
use meshward_proxy::policies::{DirSource, PolicyStore};
use meshward_proxy::{LogTargets, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const TD: &str = "cluster.local";

/// A mesh CA in a temp dir.
pub struct Ca {
    pub dir: tempfile::TempDir,
    pub ca: Arc<CertificateAuthority>,
}

impl Ca {
    pub fn new() -> Ca {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            CertificateAuthority::load_or_create(&CaFiles::new(dir.path().join("ca")), TD).unwrap();
        Ca {
            dir,
            ca: Arc::new(ca),
        }
    }

    /// A certificate for `id`, fixed (no renewal).
    pub fn cert(&self, id: &SpiffeId) -> WatchedCert {
        let (key, chain) = self.issue(id);
        let certified = tls::certified_key(&key, &chain).unwrap();
        let (tx, rx) = tokio::sync::watch::channel(Some(certified));
        // The sender lives as long as the test process: the value never changes.
        std::mem::forget(tx);
        WatchedCert(rx)
    }

    pub fn issue(&self, id: &SpiffeId) -> (rcgen::KeyPair, meshward_identity::ca::IssuedChain) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let chain = self
            .ca
            .issue_for_key(&key, id, &[], Duration::from_secs(3600))
            .unwrap();
        (key, chain)
    }

    pub fn identity(&self, id: &SpiffeId) -> WorkloadIdentity {
        WorkloadIdentity {
            id: id.clone(),
            cert: self.cert(id),
            bundle: self.ca.bundle().clone(),
            trust_domains: TrustDomains(vec![TD.into()]),
            revocations: Default::default(),
        }
    }

    /// Writes `id`'s certificate chain and key as PEM files (for curl and openssl).
    pub fn write_pem(&self, id: &SpiffeId, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let (key, chain) = self.issue(id);
        let cert = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        let root = dir.join("root.pem");
        std::fs::write(&cert, chain.to_pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::write(&root, self.ca.bundle().to_pem()).unwrap();
        (cert, key_path, root)
    }
}

pub fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}/ns/{ns}/sa/{sa}")).unwrap()
}

/// A free port on 127.0.0.1 (bound, then released).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

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
struct Frames(std::collections::VecDeque<Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
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

/// A proxy under test, with its policy directory and access log.
pub struct TestProxy {
    pub proxy: Option<Proxy>,
    pub store: PolicyStore,
    pub dir: tempfile::TempDir,
    pub inbound: Vec<SocketAddr>,
    pub outbound: Vec<SocketAddr>,
}

impl TestProxy {
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        read_json_lines(&self.dir.path().join("access.log"))
    }

    pub fn audit_log(&self) -> Vec<serde_json::Value> {
        read_json_lines(&self.dir.path().join("audit.log"))
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    /// Puts `yaml` in force now (as a control plane would).
    pub fn set_policies(&self, yaml: &str) {
        let loaded = load::load_str("test.yaml", yaml);
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        let set = meshward_policy::PolicySet::new(Default::default(), loaded.into_policies());
        self.store.replace(set, "test".into());
    }
}

/// The records of a JSON-lines log; a line still being written (no newline
/// yet) is left for the next read, any other line must parse.
pub fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: not JSON: {l}: {e}", path.display()))
        })
        .collect()
}

/// How long a change gets to take effect: generous, as CI machines are
/// shared; it costs time only when a test fails.
pub const SETTLE: Duration = Duration::from_secs(30);

/// Waits until `f` holds, or fails the test after [`SETTLE`].
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    eventually_async(what, async || f()).await;
}

/// [`eventually`] for a condition that must await (a request).
pub async fn eventually_async(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // pacing: the poll interval
    }
}

/// The value of one sample in Prometheus text, by its exact name and
/// labels (`name{a="b"}`): `None` when absent. Parsed, so `} 1` never
/// matches `} 10`.
pub fn metric(text: &str, sample: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().expect("a numeric sample"))
    })
}

pub struct ProxySpec<'a> {
    pub identity: WorkloadIdentity,
    pub namespace: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    pub inbound: Vec<String>,
    pub upstreams: Vec<String>,
    pub policies: &'a str,
    pub mesh_config: Option<&'a str>,
}

/// Starts a proxy. Inbound specs may use `PORT` for a fresh port:
/// `PORT=127.0.0.1:1234,protocol=http`.
pub async fn start_proxy(spec: ProxySpec<'_>) -> TestProxy {
    let dir = tempfile::tempdir().unwrap();
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("policies.yaml"), spec.policies).unwrap();
    let mesh_config = spec.mesh_config.map(|m| {
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, m).unwrap();
        path
    });
    let inbound: Vec<InboundPort> = spec
        .inbound
        .iter()
        .map(|s| {
            s.replace("PORT", &free_addr().port().to_string())
                .parse()
                .unwrap()
        })
        .collect();
    let upstreams: Vec<Upstream> = spec
        .upstreams
        .iter()
        .map(|s| {
            s.replace("LISTEN", &free_addr().to_string())
                .parse()
                .unwrap()
        })
        .collect();
    let source = DirSource {
        paths: vec![policy_dir.clone()],
        mesh_config,
    };
    let jwks = Arc::new(JwksCache::default());
    let set = source.load(&jwks).unwrap();
    let workload = Workload {
        namespace: spec.namespace.into(),
        labels: spec
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let store = PolicyStore::new(workload.clone(), set, source.describe());
    tokio::spawn(meshward_proxy::policies::watch_dir(
        source,
        store.clone(),
        jwks,
        Duration::from_millis(100),
        tokio_util::sync::CancellationToken::new(),
    ));
    let config = ProxyConfig {
        workload,
        inbound: inbound.clone(),
        upstreams: upstreams.clone(),
        admin: Some("127.0.0.1:0".parse().unwrap()),
        limits: Limits::default(),
        drain_grace: Duration::from_secs(3),
    };
    let logs = LogTargets {
        access: LogTarget::File(dir.path().join("access.log")),
        audit: LogTarget::File(dir.path().join("audit.log")),
    };
    let proxy = Proxy::start(config, spec.identity, store.clone(), logs)
        .await
        .unwrap();
    TestProxy {
        proxy: Some(proxy),
        store,
        dir,
        inbound: inbound.iter().map(|p| p.listen).collect(),
        outbound: upstreams.iter().map(|u| u.listen).collect(),
    }
}

/// An HTTP/1.1 GET over plain TCP; `None` when the connection is refused,
/// reset or closed without a response.
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
    let mut request = Request::get(path).header("host", "web.test");
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

pub const STRICT_NS: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: web}
spec:
  mtls: {mode: STRICT}
"#;
