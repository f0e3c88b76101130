//! Attacks on `meshward server`'s one TLS port, against the running
//! process. Mostly by a stranger: a client with no client certificate and
//! no token, speaking HTTP/2 over TLS, that opens gRPC streams and sends
//! most of a large message without ever finishing it. The server's resident
//! memory must stay within a bound, the server must close the attacking
//! connections, and an honest client's CreateCertificate (with a bootstrap
//! token) must succeed while the attack is on. Also: one address's share of
//! connections, a workload that is not the admin sending a config message,
//! and a proxy's stream, which the limits on strangers must not end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use meshward_api::control::DistributionRequest;
use meshward_api::control::distribution_client::DistributionClient;
use meshward_api::istio_ca::IstioCertificateRequest;
use meshward_api::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
use meshward_identity::limits::{
    CLOSE_GRACE, CREATE_CERTIFICATE_MAX_MESSAGE, CREATE_CERTIFICATE_PATH, Limits,
};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// How much an attack may raise the server's resident memory.
const RSS_BOUND_KIB: u64 = 20 * 1024;
/// How long the server may take to close every attacking connection.
const CLOSE_WITHIN: Duration = Duration::from_secs(120);

const CREATE_CERTIFICATE: &str = CREATE_CERTIFICATE_PATH;
const APPLY: &str = "/meshward.v1.ConfigService/Apply";
const DISTRIBUTION: &str = "/meshward.v1.Distribution/Stream";

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The server's resident memory now, and a reset of its high-water mark so
/// that [`peak_rss`] reports the peak from here on (Linux `clear_refs` 5).
fn rss_and_reset_peak(pid: u32) -> u64 {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    proc_status_kib(pid, "VmRSS:")
}

fn peak_rss(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// Where the attacker and the honest client connect.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    root_pem: String,
    tls: tokio_rustls::TlsConnector,
}

impl Target {
    fn of(mesh: &Mesh) -> Target {
        Target::with_identity(mesh, None)
    }

    /// With `identity`, (certificate chain, key) PEM files, as a client
    /// certificate.
    fn with_identity(mesh: &Mesh, identity: Option<(&Path, &Path)>) -> Target {
        let root_pem = std::fs::read_to_string(mesh.data.join("root-cert.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in meshward_identity::pem::parse_certificates(&root_pem).unwrap() {
            roots.add(cert).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match identity {
            None => config.with_no_client_auth(),
            Some((chain, key)) => {
                let chain = meshward_identity::pem::parse_certificates(
                    &std::fs::read_to_string(chain).unwrap(),
                )
                .unwrap();
                let key = PrivateKeyDer::from_pem_file(key).unwrap();
                config.with_client_auth_cert(chain, key).unwrap()
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Target {
            addr: mesh.ca_addr.parse().unwrap(),
            root_pem,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }
}

async fn tcp_from(source: IpAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

/// One stream of the attack: `path`, a gRPC frame header that announces
/// `declared` bytes, then up to `send` bytes of it as fast as the server's
/// flow control lets them through, and never the rest.
#[derive(Clone, Copy, Debug)]
struct HalfBody {
    path: &'static str,
    declared: u32,
    send: usize,
}

/// Sends one half-body; says how the stream ended: the gRPC status the
/// server answered with, or the reset.
async fn half_send(sender: h2::client::SendRequest<Bytes>, plan: HalfBody) -> String {
    let mut sender = match sender.ready().await {
        Ok(sender) => sender,
        Err(e) => return format!("reset: {e}"),
    };
    let request = http::Request::post(format!("https://localhost{}", plan.path))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = match sender.send_request(request, false) {
        Ok(sent) => sent,
        Err(e) => return format!("reset: {e}"),
    };
    let mut prefix = vec![0u8];
    prefix.extend(plan.declared.to_be_bytes());
    if let Err(e) = body.send_data(Bytes::from(prefix), false) {
        return format!("reset: {e}");
    }
    let sending = async move {
        let mut left = plan.send;
        while left > 0 {
            body.reserve_capacity(left.min(64 * 1024));
            match std::future::poll_fn(|cx| body.poll_capacity(cx)).await {
                Some(Ok(n)) if n > 0 => {
                    let n = n.min(left);
                    if body.send_data(Bytes::from(vec![0x5a; n]), false).is_err() {
                        break;
                    }
                    left -= n;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
        // Never END_STREAM: the body stays half-sent. Holding `body` keeps
        // the stream open on this side.
        std::future::pending::<()>().await;
        drop(body);
    };
    tokio::select! {
        response = response => match response {
            Ok(response) => {
                let header = |r: &http::HeaderMap| {
                    r.get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned)
                };
                let mut status = header(response.headers());
                if status.is_none() {
                    let mut recv = response.into_body();
                    while let Some(Ok(_)) = recv.data().await {}
                    status = recv.trailers().await.ok().flatten().as_ref().and_then(header);
                }
                format!("{} grpc-status {}", plan.path, status.as_deref().unwrap_or("none"))
            }
            Err(e) => format!("reset: {e}"),
        },
        () = sending => unreachable!(),
    }
}

/// The attacking connections and their streams.
#[derive(Default)]
struct Attack {
    connections: Vec<JoinHandle<()>>,
    streams: Vec<JoinHandle<Vec<String>>>,
    /// Kept, so that only the server can end the connections (an HTTP/2
    /// client ends its connection itself once it has nothing left to send).
    _senders: Vec<h2::client::SendRequest<Bytes>>,
    /// Connections the server closed before their TLS handshake.
    refused: usize,
}

impl Attack {
    /// Opens `connections` TLS connections from `source`, without a client
    /// certificate, each running every one of `streams` over and over: when
    /// the server ends a stream, the attacker opens it again, until the
    /// server closes the connection.
    async fn launch(
        &mut self,
        target: &Target,
        source: IpAddr,
        connections: usize,
        streams: &[HalfBody],
    ) {
        let attack = self;
        for _ in 0..connections {
            let tcp = tcp_from(source, target.addr).await.unwrap();
            // A connection over the server's caps is closed at once.
            let Ok(tls) = target
                .tls
                .connect("localhost".try_into().unwrap(), tcp)
                .await
            else {
                attack.refused += 1;
                continue;
            };
            let (sender, connection) = h2::client::Builder::new()
                .max_concurrent_reset_streams(1000)
                .handshake::<_, Bytes>(tls)
                .await
                .expect("the attacker's HTTP/2 handshake");
            let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let closing = closed.clone();
            attack.connections.push(tokio::spawn(async move {
                let _ = connection.await;
                closing.store(true, std::sync::atomic::Ordering::SeqCst);
            }));
            for &plan in streams {
                let (sender, closed) = (sender.clone(), closed.clone());
                attack.streams.push(tokio::spawn(async move {
                    let mut ended = Vec::new();
                    while !closed.load(std::sync::atomic::Ordering::SeqCst) {
                        ended.push(half_send(sender.clone(), plan).await);
                        // A refused stream is retried 20 times a second.
                        tokio::time::sleep(Duration::from_millis(50)).await; // pacing: the attack's retry rate
                    }
                    ended
                }));
            }
            attack._senders.push(sender);
        }
    }

    fn open_connections(&self) -> usize {
        self.connections.iter().filter(|c| !c.is_finished()).count()
    }

    /// Waits until the server has closed every connection, or `within`;
    /// then how the streams ended: each kind of ending, with its count.
    async fn closed(self, within: Duration) -> Result<BTreeMap<String, usize>, String> {
        let deadline = Instant::now() + within;
        while self.open_connections() > 0 {
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} of {} attacking connections still open after {within:?}",
                    self.open_connections(),
                    self.connections.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await; // pacing: polls the attack's connections until the deadline above
        }
        let mut ended = BTreeMap::new();
        for stream in self.streams {
            for how in stream.await.unwrap() {
                *ended.entry(how).or_insert(0) += 1;
            }
        }
        Ok(ended)
    }
}

/// An honest workload's bootstrap: CreateCertificate with a bootstrap token,
/// on a connection of its own.
async fn create_certificate(target: &Target, token: &str) -> Result<usize, tonic::Status> {
    let id = meshward_identity::SpiffeId::istio("cluster.local", "honest", "client").unwrap();
    let (_key, csr) = meshward_identity::ca::new_key_and_csr(&id).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&target.root_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", target.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting: {e:?}")))?;
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let chain = IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await?
        .into_inner()
        .cert_chain;
    Ok(chain.len())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Whether an honest bootstrap must be served during an attack.
#[derive(PartialEq)]
enum Honest {
    Served,
    /// The attack fills every place for connections without a client
    /// certificate: a bootstrap may be refused until it ends.
    MayBeRefused,
}

/// Runs `streams` on each of `connections` stranger connections from each
/// of `strangers` against a fresh server: RSS raised by less than
/// [`RSS_BOUND_KIB`], every attacking connection closed by the server, an
/// honest bootstrap (from 127.0.0.1) served meanwhile if `honest` says so.
/// Returns how many attacking connections were refused at once.
fn attack_is_contained(
    name: &str,
    strangers: &[&str],
    connections: usize,
    streams: &[HalfBody],
    honest: Honest,
) -> usize {
    let dir = tempdir(name);
    let mesh = server(&dir);
    let pid = mesh.server.0.id();
    let token = std::fs::read_to_string(mesh.token("honest", "client")).unwrap();
    let token = token.trim().to_owned();
    let target = Target::of(&mesh);

    let refused = runtime().block_on(async {
        // Warm up: the first request's one-time allocations are not the attack's.
        create_certificate(&target, &token)
            .await
            .expect("an honest bootstrap before the attack");
        let before = rss_and_reset_peak(pid);
        let started = Instant::now();
        let mut attack = Attack::default();
        for stranger in strangers {
            let stranger: IpAddr = stranger.parse().unwrap();
            attack.launch(&target, stranger, connections, streams).await;
        }
        let refused = attack.refused;

        let bootstrap = create_certificate(&target, &token).await;
        let open_meanwhile = attack.open_connections();
        let ended = attack.closed(CLOSE_WITHIN).await;
        let closed_after = started.elapsed();
        let peak = peak_rss(pid);
        let after = proc_status_kib(pid, "VmRSS:");
        println!(
            "{name}: server RSS {before} KiB before, peak {peak} KiB (+{} KiB), {after} KiB after; \
             {refused} attacking connections refused at once, the others closed after \
             {closed_after:?}; honest CreateCertificate with {open_meanwhile} attacking \
             connections open: {bootstrap:?}",
            peak.saturating_sub(before)
        );
        let ended = ended.unwrap();
        println!("{name}: how the attacking streams ended: {ended:?}");
        assert!(
            peak.saturating_sub(before) < RSS_BOUND_KIB,
            "the attack raised the server's RSS from {before} KiB to {peak} KiB"
        );
        if honest == Honest::Served {
            assert_eq!(
                bootstrap.expect("an honest bootstrap during the attack"),
                2,
                "a workload certificate and the root"
            );
        }
        refused
    });
    std::fs::remove_dir_all(dir).ok();
    refused
}

/// (a) 20 connections, each with streams to every method that send large
/// half-bodies: messages announced at 4 MiB (gRPC's usual maximum) with
/// 2 MiB sent, and messages announced just under 64 KiB with all but one
/// byte sent.
#[test]
fn twenty_stranger_connections_with_half_sent_bodies_are_contained() {
    let large = |path| HalfBody {
        path,
        declared: 4 << 20,
        send: 2 << 20,
    };
    let small = |path| HalfBody {
        path,
        declared: (64 << 10) - 6,
        send: (64 << 10) - 7,
    };
    attack_is_contained(
        "attack-twenty",
        &["127.0.0.1"],
        20,
        &[
            large(CREATE_CERTIFICATE),
            small(CREATE_CERTIFICATE),
            large(APPLY),
            small(DISTRIBUTION),
        ],
        Honest::Served,
    );
}

/// (b) One connection with 100 streams, each a 1 MiB message sent but for
/// its last byte.
#[test]
fn one_stranger_connection_with_a_hundred_half_sent_streams_is_contained() {
    let streams: Vec<HalfBody> = [CREATE_CERTIFICATE, APPLY, DISTRIBUTION]
        .iter()
        .cycle()
        .take(100)
        .map(|&path| HalfBody {
            path,
            declared: 1 << 20,
            send: (1 << 20) - 1,
        })
        .collect();
    attack_is_contained(
        "attack-hundred",
        &["127.0.0.1"],
        1,
        &streams,
        Honest::Served,
    );
}

/// (c) The most one address can hold: its whole share of connections,
/// each with as many streams as the server allows, every one a
/// CreateCertificate message just under the size limit with all but its
/// last byte sent.
#[test]
fn one_stranger_address_at_every_limit_is_contained() {
    let limits = Limits::default();
    let at_the_limit = HalfBody {
        path: CREATE_CERTIFICATE,
        declared: CREATE_CERTIFICATE_MAX_MESSAGE as u32 - 1,
        send: CREATE_CERTIFICATE_MAX_MESSAGE - 2,
    };
    attack_is_contained(
        "attack-share",
        &["127.0.0.2"],
        limits.unauthenticated_per_peer,
        &vec![at_the_limit; limits.unauthenticated.max_concurrent_streams as usize],
        Honest::Served,
    );
}

/// A stranger's address holds at most its share of connections without a
/// client certificate (here: connections that never start their TLS
/// handshake); one more is closed at once, while the share stays open and
/// a workload from another address bootstraps.
#[test]
fn one_address_gets_its_share_of_connections_and_no_more() {
    let dir = tempdir("attack-per-peer");
    let mesh = server(&dir);
    let token = std::fs::read_to_string(mesh.token("honest", "client")).unwrap();
    let token = token.trim().to_owned();
    let target = Target::of(&mesh);
    let share = Limits::default().unauthenticated_per_peer;
    let stranger: IpAddr = "127.0.0.3".parse().unwrap();

    runtime().block_on(async {
        let mut held = Vec::new();
        for _ in 0..share {
            held.push(tcp_from(stranger, target.addr).await.unwrap());
        }
        let mut over = tcp_from(stranger, target.addr).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(CLOSE_WITHIN, over.read(&mut byte))
            .await
            .expect("the connection over the share is closed");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "closed without a byte: {read:?}"
        );
        // The share was not closed with it (the handshake timeout, which
        // would close them first, has not struck).
        for (i, conn) in held.iter().enumerate() {
            let open = matches!(conn.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            assert!(open, "connection {i} of the share was closed too");
        }
        assert_eq!(
            create_certificate(&target, &token)
                .await
                .expect("a bootstrap from another address"),
            2
        );
        // Once the stranger's connections are gone, its address connects again.
        drop(held);
        let deadline = Instant::now() + CLOSE_WITHIN;
        loop {
            let tcp = tcp_from(stranger, target.addr).await.unwrap();
            if target
                .tls
                .connect("localhost".try_into().unwrap(), tcp)
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the address was not admitted again"
            );
            tokio::time::sleep(Duration::from_millis(100)).await; // pacing: retries a connection until the deadline above
        }
    });
    std::fs::remove_dir_all(dir).ok();
}

/// A proxy's distribution stream, over a connection with its workload
/// certificate, is not bound by what bounds strangers: it is still open
/// and delivers a new policy after an unauthenticated connection's whole
/// lifetime and a request's deadline have passed.
#[test]
fn a_proxy_stream_outlives_the_limits_of_strangers() {
    let dir = tempdir("attack-member");
    let mesh = server(&dir);
    let (cert, key, root) = mesh.issue("web", "web");
    let limits = Limits::default();
    let outlive = (limits.unauthenticated.lifetime.unwrap() + CLOSE_GRACE)
        .max(limits.authenticated.request_timeout)
        + Duration::from_secs(2);

    runtime().block_on(async {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read_to_string(root).unwrap()))
            .identity(Identity::from_pem(
                std::fs::read_to_string(cert).unwrap(),
                std::fs::read_to_string(key).unwrap(),
            ))
            .domain_name("localhost");
        let channel = Channel::from_shared(format!("https://{}", mesh.ca_addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(DistributionRequest::default()).await.unwrap();
        let mut stream = DistributionClient::new(channel)
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().expect("a first snapshot");
        tx.send(DistributionRequest {
            response_nonce: first.nonce,
            ..Default::default()
        })
        .await
        .unwrap();

        tokio::time::sleep(outlive).await; // pacing: the stream must outlive a stranger's lifetime
        let policy = dir.join("late.yaml");
        std::fs::write(
            &policy,
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: late, namespace: istio-system}\nspec: {action: DENY, rules: [{to: [{operation: {paths: [/late]}}]}]}\n",
        )
        .unwrap();
        let applied = mesh.admin(&["apply", "-f", policy.to_str().unwrap()]);
        assert!(applied.status.success(), "{applied:?}");
        let delivered = tokio::time::timeout(CLOSE_WITHIN, async {
            loop {
                let response = stream
                    .message()
                    .await
                    .expect("the stream is still open")
                    .expect("the stream is still open");
                if response.resources.iter().any(|r| r.name.ends_with("/late")) {
                    return;
                }
                tx.send(DistributionRequest {
                    response_nonce: response.nonce,
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        })
        .await;
        assert!(delivered.is_ok(), "the policy never arrived on the stream");
    });
    std::fs::remove_dir_all(dir).ok();
}

/// (d) The most strangers can hold together: from many addresses, every
/// one at its share, more connections than the total cap, each as in (c).
/// The connections over the cap are refused at once; the rest hold what
/// the total cap and the body budget allow, within the same bound. (Honest
/// bootstraps may be refused while every place is taken.)
#[test]
fn strangers_from_many_addresses_at_every_limit_are_contained() {
    let limits = Limits::default();
    let at_the_limit = HalfBody {
        path: CREATE_CERTIFICATE,
        declared: CREATE_CERTIFICATE_MAX_MESSAGE as u32 - 1,
        send: CREATE_CERTIFICATE_MAX_MESSAGE - 2,
    };
    let addresses = limits.unauthenticated_total / limits.unauthenticated_per_peer + 2;
    let strangers: Vec<String> = (0..addresses)
        .map(|i| format!("127.0.1.{}", i + 1))
        .collect();
    let strangers: Vec<&str> = strangers.iter().map(String::as_str).collect();
    let refused = attack_is_contained(
        "attack-total",
        &strangers,
        limits.unauthenticated_per_peer,
        &vec![at_the_limit; limits.unauthenticated.max_concurrent_streams as usize],
        Honest::MayBeRefused,
    );
    assert!(
        refused >= addresses * limits.unauthenticated_per_peer - limits.unauthenticated_total,
        "{refused} connections over the total were refused"
    );
}

/// A workload of the mesh (a valid client certificate, not the admin's)
/// cannot make the server read a large config message: its Apply is
/// refused on its headers, while its body is still half-sent.
#[test]
fn a_workload_cannot_make_the_server_read_a_config_message() {
    let dir = tempdir("attack-workload-config");
    let mesh = server(&dir);
    let (cert, key, _) = mesh.issue("web", "web");
    let target = Target::with_identity(&mesh, Some((&cert, &key)));

    runtime().block_on(async {
        let tcp = tcp_from("127.0.0.1".parse().unwrap(), target.addr)
            .await
            .unwrap();
        let tls = target
            .tls
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let (sender, connection) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(connection);
        let half = HalfBody {
            path: APPLY,
            declared: 4 << 20,
            send: 1 << 20,
        };
        let ended = tokio::time::timeout(CLOSE_WITHIN, half_send(sender, half))
            .await
            .expect("an answer");
        // 7: PERMISSION_DENIED (a server that read first would wait for the
        // rest of the message, then answer DEADLINE_EXCEEDED).
        assert_eq!(ended, format!("{APPLY} grpc-status 7"));
    });
    std::fs::remove_dir_all(dir).ok();
}
