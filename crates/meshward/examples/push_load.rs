//! Push convergence: N simulated proxies (in-process distribution clients,
//! each with its own workload identity and certificate, each on its own
//! mutual TLS connection) against one `meshward server` process. Measures,
//! for one policy applied, the time until every proxy has received and
//! ACKed it (p50/p99/max), the server's CPU for that push, and its memory.
//!
//! With `--servers K` (K > 1), K servers share one etcd (Debian's `etcd`,
//! one member, started here on loopback ports) and one CA (sealed there by
//! the first); proxies are spread over them in turn, the policy is applied
//! through the first, and each server's RSS is reported.
//!
//! ```sh
//! cargo build --release -p meshward && cargo run --release -p meshward --example push_load -- 100 1000 5000
//! cargo run --release -p meshward --example push_load -- --servers 3 3000
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshward_api::control::config_service_client::ConfigServiceClient;
use meshward_api::control::distribution_client::DistributionClient;
use meshward_api::control::{ApplyRequest, DistributionRequest};
use meshward_identity::ca::{CaFiles, CertificateAuthority};
use meshward_identity::spiffe::SpiffeId;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn policy(name: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: istio-system}}\nspec: {{action: DENY, rules: [{{to: [{{operation: {{paths: [/{name}]}}}}]}}]}}\n"
    )
}

async fn channel(addr: &str, root: &str, cert: String, key: String) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root))
        .identity(Identity::from_pem(cert, key))
        .domain_name("localhost");
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .await
        .unwrap()
}

fn proc_stat(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (ticks / 100.0, rss_kb)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A `meshward server` with `extra` arguments: (process, address).
fn start_server(
    data: &std::path::Path,
    n: usize,
    extra: &[String],
) -> (std::process::Child, String) {
    let mut server = Command::new(meshward_binary())
        .args([
            "server",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            // Every simulated proxy connects from 127.0.0.1 at once, and
            // counts as unauthenticated until its TLS handshake is done.
            "--max-unauthenticated-per-peer",
            &(n + 16).to_string(),
            "--max-unauthenticated",
            &(n + 16).to_string(),
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let mut addr = String::new();
    while addr.is_empty() {
        let line = lines.next().unwrap().unwrap();
        if let Some(rest) = line.strip_prefix("listening on https://") {
            addr = rest.split_whitespace().next().unwrap().to_owned();
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    (server, addr)
}

/// A free port on 127.0.0.1 (probed and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd member on loopback ports: (process, `etcd://…`).
fn start_etcd(dir: &std::path::Path) -> (std::process::Child, String) {
    let (client, peer) = (free_port(), free_port());
    let etcd = Command::new("etcd")
        .args([
            "--name",
            "bench",
            "--data-dir",
            dir.join("etcd").to_str().unwrap(),
        ])
        .args([
            "--listen-client-urls",
            &format!("http://127.0.0.1:{client}"),
        ])
        .args([
            "--advertise-client-urls",
            &format!("http://127.0.0.1:{client}"),
        ])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args([
            "--initial-cluster",
            &format!("bench=http://127.0.0.1:{peer}"),
        ])
        .args(["--max-txn-ops", "1024", "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        assert!(Instant::now() < deadline, "etcd did not start");
        std::thread::sleep(Duration::from_millis(50)); // pacing: a bounded poll
    }
    (etcd, format!("etcd://127.0.0.1:{client}"))
}

async fn run(n: usize, servers: usize) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut etcd = None;
    let mut shared = Vec::new();
    if servers > 1 {
        let (process, store) = start_etcd(dir.path());
        etcd = Some(process);
        let key = dir.path().join("sealing.key");
        std::fs::write(&key, "07".repeat(32)).unwrap();
        shared = vec![
            "--store".to_owned(),
            store,
            "--ca-key-encryption-key-file".to_owned(),
            key.display().to_string(),
        ];
    }
    let (mut server, addr) = start_server(&data, n, &shared);
    let pid = server.id();
    let mut others = Vec::new();
    for k in 1..servers {
        others.push(start_server(
            &dir.path().join(format!("data-{k}")),
            n,
            &shared,
        ));
    }
    let addresses: Vec<String> = std::iter::once(addr.clone())
        .chain(others.iter().map(|(_, a)| a.clone()))
        .collect();
    let pids: Vec<u32> = std::iter::once(pid)
        .chain(others.iter().map(|(p, _)| p.id()))
        .collect();
    let root = std::fs::read_to_string(data.join("root-cert.pem")).unwrap();
    let admin = data.join("admin");
    let read = |f: &str| std::fs::read_to_string(admin.join(f)).unwrap();
    let mut config = ConfigServiceClient::new(
        channel(&addr, &root, read("cert-chain.pem"), read("key.pem")).await,
    );
    config
        .apply(ApplyRequest {
            file: "p.yaml".into(),
            text: policy("initial"),
            mesh_config: false,
        })
        .await
        .unwrap();

    // N identities, certificates straight from the CA's files.
    let ca = CertificateAuthority::load_or_create(&CaFiles::new(data.join("ca")), "cluster.local")
        .unwrap();
    let (_, rss_idle) = proc_stat(pid);
    let connect_start = Instant::now();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<usize>();
    let mut tasks = Vec::new();
    for i in 0..n {
        let id = SpiffeId::istio(
            "cluster.local",
            &format!("ns-{}", i % 50),
            &format!("sa-{i}"),
        )
        .unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let chain = ca
            .issue_for_key(&key, &id, &[], Duration::from_secs(3600))
            .unwrap();
        let (addr, root) = (addresses[i % addresses.len()].clone(), root.clone());
        let (done_tx, ready_tx) = (done_tx.clone(), ready_tx.clone());
        tasks.push(tokio::spawn(async move {
            let ch = channel(&addr, &root, chain.to_pem(), key.serialize_pem()).await;
            let (tx, rx) = mpsc::channel(4);
            tx.send(DistributionRequest::default()).await.unwrap();
            let mut stream = DistributionClient::new(ch)
                .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            while let Ok(Some(response)) = stream.message().await {
                let has_change = response
                    .resources
                    .iter()
                    .any(|r| r.name.ends_with("/changed"));
                let _ = tx
                    .send(DistributionRequest {
                        response_nonce: response.nonce.clone(),
                        ..Default::default()
                    })
                    .await;
                if response.full {
                    let _ = ready_tx.send(i);
                }
                if has_change {
                    let _ = done_tx.send((i, Instant::now()));
                }
            }
        }));
    }
    for _ in 0..n {
        ready_rx.recv().await.unwrap();
    }
    let connected_in = connect_start.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu_before, rss_connected) = proc_stat(pid);
    let start = Instant::now();
    config
        .apply(ApplyRequest {
            file: "c.yaml".into(),
            text: policy("changed"),
            mesh_config: false,
        })
        .await
        .unwrap();
    let mut times = Vec::with_capacity(n);
    while times.len() < n {
        match tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await {
            Ok(Some((_, at))) => times.push(at.duration_since(start)),
            _ => break,
        }
    }
    let (cpu_after, rss_after) = proc_stat(pid);
    let rss_each: Vec<String> = pids
        .iter()
        .map(|p| format!("{:.1}", proc_stat(*p).1 as f64 / 1024.0))
        .collect();
    times.sort();
    println!(
        "| {n} | {servers} | {:.0} ms | {:.0} ms | {:.0} ms | {}/{n} | {:.2} s | {:.1} MiB | {:.1} MiB | {} MiB | {:.1} s |",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        times.len(),
        cpu_after - cpu_before,
        rss_idle as f64 / 1024.0,
        rss_connected.max(rss_after) as f64 / 1024.0,
        rss_each.join(" / "),
        connected_in.as_secs_f64(),
    );
    for t in tasks {
        t.abort();
    }
    let _ = server.kill();
    let _ = server.wait();
    for (mut other, _) in others {
        let _ = other.kill();
        let _ = other.wait();
    }
    if let Some(mut etcd) = etcd {
        let _ = etcd.kill();
        let _ = etcd.wait();
    }
}

/// `$MESHWARD`, or the `meshward` built beside this example.
fn meshward_binary() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("MESHWARD") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|examples| examples.parent())
        .unwrap()
        .join("meshward")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let servers = args
        .iter()
        .position(|a| a == "--servers")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(1);
    let sizes: Vec<usize> = args
        .iter()
        .enumerate()
        .filter(|(i, _)| *i == 0 || args[i - 1] != "--servers")
        .filter_map(|(_, a)| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100, 1000]
    } else {
        sizes
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "| proxies | servers | p50 | p99 | max | ACKed | first server's CPU for the push | its RSS idle | its RSS connected | each server's RSS | connect time |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in sizes {
        runtime.block_on(run(n, servers));
    }
}
