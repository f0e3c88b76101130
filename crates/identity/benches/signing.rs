//! CSR signing throughput of the mesh CA: parse and verify the CSR, build
//! the X.509-SVID from the authenticated identity, sign it (ECDSA P-256),
//! and assemble the chain — everything `CreateCertificate` does after
//! authenticating the caller.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshward_identity::ca::new_key_and_csr;
use meshward_identity::{CaFiles, CertificateAuthority, SpiffeId};

fn signing(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let ca =
        CertificateAuthority::load_or_create(&CaFiles::new(dir.path()), "cluster.local").unwrap();
    let id = SpiffeId::istio("cluster.local", "bench", "workload").unwrap();
    let (_key, csr) = new_key_and_csr(&id).unwrap();
    let mut group = c.benchmark_group("ca");
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign_csr", |b| {
        b.iter(|| black_box(ca.sign_csr(black_box(&csr), &id, None).unwrap()))
    });
    group.bench_function("new_key_and_csr", |b| {
        b.iter(|| black_box(new_key_and_csr(&id).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, signing, grpc_issuance);
criterion_main!(benches);

/// The whole `CreateCertificate` round trip over TLS on loopback, one
/// request at a time: HTTP/2, token verification, signing, response.
fn grpc_issuance(c: &mut Criterion) {
    use std::sync::Arc;

    use meshward_api::istio_ca::IstioCertificateRequest;
    use meshward_api::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
    use meshward_identity::service::{self, BootstrapTokens, CallerAuthenticator};
    use meshward_identity::token::TokenAuthority;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};

    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(
        CertificateAuthority::load_or_create(&CaFiles::new(dir.path()), "cluster.local").unwrap(),
    );
    let tokens = TokenAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
    let id = SpiffeId::istio("cluster.local", "bench", "workload").unwrap();
    let token = tokens.create(&id, Duration::from_secs(3600)).unwrap();
    let (_key, csr) = new_key_and_csr(&id).unwrap();
    let bundle = ca.bundle().to_pem();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut client = runtime.block_on(async {
        let server_cert = service::ServerCertificate::start(
            ca.clone(),
            "istio-system".into(),
            Vec::new(),
            Duration::from_secs(3600),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let authenticators: Vec<Box<dyn CallerAuthenticator>> =
            vec![Box::new(BootstrapTokens(tokens))];
        let server_ca = ca.clone();
        tokio::spawn(async move {
            let cert = server_cert.cert.clone();
            service::serve(
                listener,
                server_ca,
                cert,
                authenticators,
                std::future::pending(),
            )
            .await
            .unwrap();
            drop(server_cert);
        });
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&bundle))
            .domain_name("localhost");
        let channel = Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        IstioCertificateServiceClient::new(channel)
    });
    let mut group = c.benchmark_group("ca");
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(1));
    group.bench_function("grpc_create_certificate", |b| {
        b.iter(|| {
            let mut request = tonic::Request::new(IstioCertificateRequest {
                csr: csr.clone(),
                validity_duration: 0,
                metadata: None,
            });
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            black_box(
                runtime
                    .block_on(client.create_certificate(request))
                    .unwrap(),
            )
        })
    });
    group.finish();
}
