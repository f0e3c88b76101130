//! A snapshot far larger than every per-stream buffer and window on its
//! way (the codec's 1 KiB start, tonic's 32 KiB batches, HTTP/2's 64 KiB
//! initial windows and 16 KiB frames) reaches a proxy whole over the
//! server's real port (mutual TLS, the port's limits), and so does the
//! delta after it; each is ACKed and the server records it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use meshward_api::control::distribution_client::DistributionClient;
use meshward_api::control::distribution_server::DistributionServer;
use meshward_api::control::{DistributionRequest, DistributionResponse};
use meshward_control_plane::push::{DistributionService, Hub};
use meshward_control_plane::store::Store;
use meshward_identity::ca::{CaFiles, CertificateAuthority};
use meshward_identity::limits::Limits;
use meshward_identity::service::{ServerCertificate, serve_routes};
use meshward_identity::spiffe::SpiffeId;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// How long any one step may take.
const STEP: Duration = Duration::from_secs(60);

/// A root-namespace policy (so every proxy is sent it) of about `kib` KiB.
fn big_policy(name: &str, kib: usize) -> String {
    let paths: Vec<String> = (0..kib * 1024 / 64)
        .map(|i| format!("/{name}/{i:08}/{}", "p".repeat(40)))
        .collect();
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: istio-system}}\nspec: {{action: DENY, rules: [{{to: [{{operation: {{paths: [{}]}}}}]}}]}}\n",
        paths.join(", ")
    )
}

async fn next(stream: &mut tonic::Streaming<DistributionResponse>) -> DistributionResponse {
    tokio::time::timeout(STEP, stream.message())
        .await
        .expect("a response within the deadline")
        .expect("the stream is healthy")
        .expect("the stream is open")
}

fn body_bytes(response: &DistributionResponse) -> usize {
    response.resources.iter().map(|r| r.body.len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_megabyte_snapshot_and_its_delta_arrive_whole_and_are_acked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(
        CertificateAuthority::load_or_create(&CaFiles::new(dir.path().join("ca")), "cluster.local")
            .unwrap(),
    );
    let store = Arc::new(Store::open(&dir.path().join("store.redb")).unwrap());
    for i in 0..8 {
        let name = format!("big-{i}");
        store
            .apply(&format!("{name}.yaml"), &big_policy(&name, 300))
            .unwrap();
    }
    let hub = Arc::new(Hub::new(
        store.clone(),
        ca.trust_domain().to_owned(),
        ca.bundle().to_pem(),
    ));

    let server_cert = ServerCertificate::start(
        ca.clone(),
        "istio-system".into(),
        Vec::new(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes =
        tonic::service::Routes::new(DistributionServer::new(DistributionService(hub.clone())));
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn({
        let ca = ca.clone();
        let revocations = store.revocations();
        async move {
            serve_routes(
                listener,
                &ca,
                server_cert.cert.clone(),
                revocations,
                routes,
                Limits::default(),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
        }
    });

    // A proxy: a workload certificate straight from the CA.
    let id = SpiffeId::istio("cluster.local", "web", "web").unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let chain = ca
        .issue_for_key(&key, &id, &[], Duration::from_secs(3600))
        .unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.bundle().to_pem()))
        .identity(Identity::from_pem(chain.to_pem(), key.serialize_pem()))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(DistributionRequest::default()).await.unwrap();
    let mut stream = DistributionClient::new(channel)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    let snapshot = next(&mut stream).await;
    assert!(snapshot.full);
    let policies: Vec<&str> = snapshot
        .resources
        .iter()
        .filter(|r| r.name.starts_with("AuthorizationPolicy/istio-system/big-"))
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(policies.len(), 8, "{policies:?}");
    assert!(
        body_bytes(&snapshot) > 2 << 20,
        "the snapshot is {} bytes",
        body_bytes(&snapshot)
    );
    // Each policy arrived whole: its body is the JSON the store holds.
    let config = store.config();
    for resource in &snapshot.resources {
        if let Some(name) = resource
            .name
            .strip_prefix("AuthorizationPolicy/istio-system/")
        {
            let body: serde_json::Value = serde_json::from_slice(&resource.body).unwrap();
            assert_eq!(body["metadata"]["name"], name);
            let policy = config
                .policies
                .iter()
                .find(|p| p.metadata().name == name)
                .unwrap();
            assert_eq!(body, serde_json::to_value(policy).unwrap());
        }
    }
    tx.send(DistributionRequest {
        response_nonce: snapshot.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // One more large policy: the delta is that policy alone.
    store
        .apply("big-8.yaml", &big_policy("big-8", 600))
        .unwrap();
    let version = store.config().version;
    hub.changed(version);
    let delta = next(&mut stream).await;
    assert!(!delta.full);
    let names: Vec<&str> = delta.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["AuthorizationPolicy/istio-system/big-8"]);
    assert!(body_bytes(&delta) > 512 << 10);
    assert_eq!(delta.system_version, version.to_string());
    tx.send(DistributionRequest {
        response_nonce: delta.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // The server records the ACK of that version.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let status = hub.status();
        if status.len() == 1 && status[0].acked_version == version {
            assert_eq!(status[0].identity, id.to_string());
            assert!(status[0].nack.is_empty());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ACK of version {version} was not recorded: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // pacing: a bounded poll
    }

    drop((tx, stream));
    let _ = stop.send(());
    tokio::time::timeout(STEP, server).await.unwrap().unwrap();
}
